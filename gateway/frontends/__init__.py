"""Protocol adapters: decode a request into a dataplane Call, encode the answer, map errors."""
