"""Gradient-based attribution methods. Each is one module plus one `conf/method/*.yaml`
whose `_target_` names a :class:`tda.methods.base.Method` subclass."""
