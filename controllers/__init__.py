"""Knobs and policies: the control loop that trades clock, batch cap and speculation against the SLO.

Sits above ``serving/`` (it applies :class:`serving.types.Knobs` to engines) and ``profilers/`` (it reads power).
"""
