"""Devices: the mesh, shardings, and placing host batches onto the devices."""
