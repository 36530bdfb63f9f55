"""istiod_lite's certificate authority: the root (`root`), node tokens (`tokens`), caller
authentication (`authn`) and the `IstioCertificateService` gRPC servicer (`server`)."""
