"""Workloads for harvest: offline job kinds (registry.py and one module per kind), online arrival
traces (traces.py, trace_replay.py), the benchmark harness (bench/) and small sample data (data/)."""
