"""The leaderboard: releases x tasks ranked in SQL (`service.rank_releases`), served as JSON
and drawn by the web pages; paired comparisons of releases on the same examples
(`comparisons`)."""
