"""Pipeline parallelism: schedule programs, executor, P2P, simulator."""
