"""Graph passes run by ``qatgraph.compile`` (installed as ``qatgraph.passes``)."""
