"""The leaderboard as JSON: releases x tasks (the web pages draw it from `service.leaderboard`)."""
