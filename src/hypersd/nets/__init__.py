"""The networks around the teacher: the roles that say which one runs, FP8, speed options, tiny architectures."""
