"""Tools an AI agent calls over HTTP: refunds for the shop's orders."""
