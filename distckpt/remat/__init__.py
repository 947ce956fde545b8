"""Mesh-aware remat: plans, the planner and measurements."""
