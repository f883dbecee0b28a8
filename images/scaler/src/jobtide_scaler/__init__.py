"""jobtide scaler."""
