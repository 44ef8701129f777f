"""The operators' REST API (FastAPI): ``create_app(settings)`` in ``cloud.api.main``."""
