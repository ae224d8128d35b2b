"""Track E_circuits."""
