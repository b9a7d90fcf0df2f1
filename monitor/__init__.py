"""What a run reports: CLU writers, step timing, input wait."""
