"""Training recipes of the toy-model zoo, one module per toy (see helpers.models.zoo)."""
