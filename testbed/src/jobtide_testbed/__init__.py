"""jobtide's test bed: real RabbitMQ and Kubernetes components on loopback, started and
stopped by the tests (pytest fixtures in tests/conftest.py) or by hand (`ci/testbed`)."""
