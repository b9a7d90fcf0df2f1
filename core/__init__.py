"""The ground floor: the error type, atomic file writes, tree paths, logical axis names, host facts."""
