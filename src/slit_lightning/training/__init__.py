"""What the Lightning stages train with: checkpoint I/O and guards, the dashboard, FSDP, precision,
learning-rate schedules and progress bars."""
