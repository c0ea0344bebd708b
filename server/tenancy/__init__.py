"""Tenants: API keys (who is calling) and per-tenant rate limits."""
