"""Suites: the YAML files in this folder (see README.md here); each `*.yaml` is registered by its file name."""
