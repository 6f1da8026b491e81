"""dlforge.common: events, ports and the service runtime shared by every dlforge service."""
