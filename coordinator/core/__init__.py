"""Settings, database, logging and the app factory shared by every domain."""
