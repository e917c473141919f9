"""Measuring and accounting: power sources, energy windows, footprint and the Prometheus exporter.

This is the bottom layer of the testbed: it imports nothing else of ours.
"""
