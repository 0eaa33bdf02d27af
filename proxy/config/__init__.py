"""Configuration: settings, the token and its rotation, the config file, client keys."""
