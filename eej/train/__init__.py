"""Training of the methods' add-ons: a registered trainer per method, data, one optax/orbax loop, teacher caches."""
