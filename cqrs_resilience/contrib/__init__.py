"""Integrations, each in its own module behind its own extra:

- `cqrs_resilience.contrib.starlette` (`pip install 'cqrs-resilience[starlette]'`): Starlette
  and FastAPI apps answer the library's errors with problem details;
- `cqrs_resilience.contrib.procrastinate` (`pip install 'cqrs-resilience[procrastinate]'`):
  commands as jobs of procrastinate's PostgreSQL queue.
"""
