"""Load: arrival processes, length distributions, the async load client, SLOs, campaigns and reports."""
