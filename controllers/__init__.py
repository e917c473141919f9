"""Knobs and policies: the control loop that trades clock, batch cap and speculation against the SLO.

Sits above ``serving/`` (it applies :class:`serving.types.Knobs` to engines) and ``profilers/`` (it reads power).
"""

# The DVFS node agent's port, here so the CLI and the remote controller need not import the agent's web stack.
# Not 9400: dcgm-exporter's port on the same GPU nodes; the meter has its own (9402).
NODE_AGENT_PORT = 9401
