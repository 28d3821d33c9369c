"""The block layer: nodes, their drivers and the graph that links them."""
