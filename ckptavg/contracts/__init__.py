"""The files the daemon writes and other commands read, each described once."""
