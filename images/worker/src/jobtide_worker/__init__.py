"""jobtide worker."""
