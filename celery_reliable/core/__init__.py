"""The core every feature builds on: settings, the Redis store, the task-extension
contract, per-app state, metric instruments and errors. Nothing here imports a feature."""
