"""Expert-level machinery for mixture-of-experts models: MoEfication of a dense model, expert caches and offloading."""
