"""Composition: the CLI, local and Ray bring-up of the deployment, and running campaigns against it."""
