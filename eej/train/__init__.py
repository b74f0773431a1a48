"""Training of the methods' add-ons: data, one optax/orbax loop, teacher caches, artifacts."""
