"""The faust application: topics, agents and the worker entry points."""
