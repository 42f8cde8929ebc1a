"""The pipeline stages, one package each: config, pure logic, Ray actors, and ``run_<stage>``."""
