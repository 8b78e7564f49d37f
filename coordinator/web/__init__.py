"""The pages people read: leaderboard, releases with their routing analysis, the catalog.

Server-rendered (Jinja2), one CSS file, a little vanilla JS, PNG plots from matplotlib;
nothing is fetched from outside the coordinator. Every list is paginated in SQL.
"""
