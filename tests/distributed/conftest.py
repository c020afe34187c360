from tests.integration.conftest import small_dataset  # noqa: F401  (the same tiny corpus)
