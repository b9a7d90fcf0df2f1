"""Everything that exists only to make a backend fast; models reach it through an ops interface."""
