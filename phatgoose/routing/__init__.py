"""Routers over many experts: PHATGOOSE and the baselines it is compared with.

`layer.py` is what one routed linear computes, `model.py` puts routed linears into a model,
`rows.py` gives each method's router rows and `stats.py` counts the experts chosen.
"""

from phatgoose.routing.layer import RoutedLinear, standardise
from phatgoose.routing.model import (
    METHODS,
    build_routed_model,
    queries,
    routing_state,
    unroute_model,
)
from phatgoose.routing.stats import RoutingStats, capture_routing

__all__ = [
    "METHODS",
    "RoutedLinear",
    "RoutingStats",
    "build_routed_model",
    "capture_routing",
    "queries",
    "routing_state",
    "standardise",
    "unroute_model",
]
