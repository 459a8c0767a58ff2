"""Which backend model serves a public model name: the route table compiled at config load."""
from gateway.routing.table import Route, RouteTable, compile_routes

__all__ = ["Route", "RouteTable", "compile_routes"]
