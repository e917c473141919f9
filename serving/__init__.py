"""Engines and where they run: the engine protocol, emulated devices, Ray replicas, router and front door."""
