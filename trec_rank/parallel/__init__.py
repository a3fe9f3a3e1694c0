"""Distributed side: process groups, planning, sharding. Model code never imports this package."""
