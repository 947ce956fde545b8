"""Hosts of one job: the coordinator (initialize, named barriers, primary-decides) and coordinated preemption."""
