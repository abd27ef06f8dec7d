"""Side-by-side benchmarks of shmhub against the transports Python users pick instead (`make bench`)."""
