"""Routers over many experts: PHATGOOSE and the baselines it is compared with.

`routers.py` is the routing math (who is chosen for a token, with what weight),
`layer.py` what one routed linear computes with the chosen experts, `model.py` puts routed
linears into a model, `rows.py` gives each method's router rows and `stats.py` counts the
experts chosen.
"""

from phatgoose.routing.layer import RoutedLinear
from phatgoose.routing.model import (
    build_routed_model,
    queries,
    reorder_routing,
    routing_state,
    unroute_model,
)
from phatgoose.routing.routers import standardise
from phatgoose.routing.stats import RoutingStats, capture_routing
from protocol.methods import METHODS

__all__ = [
    "METHODS",
    "RoutedLinear",
    "RoutingStats",
    "build_routed_model",
    "capture_routing",
    "queries",
    "reorder_routing",
    "routing_state",
    "standardise",
    "unroute_model",
]
