// Package deploy renders and applies the Kubernetes objects of each deployment model, and
// builds the isthmus image they run.
//
// Render (pure) turns Values — a model, this cluster's role in it, and the files the role
// needs (plug-in CA, remote secrets, a config cluster's credential) — into the objects the
// cluster needs: namespace, service accounts, least-privilege RBAC, the primary's
// Deployment and Service, the east-west gateway's, the cacerts Secret, remote secrets and
// Istio's CRDs. Apply sends them with server-side apply under one field manager, keeps an
// inventory ConfigMap so that the next Apply prunes what is no longer rendered, and
// Uninstall removes exactly what the inventory lists. BuildImage and WriteImageTarball
// make the image (a static binary on an empty base) without a daemon or a registry.
//
// cmd/isthmus imports it for `isthmus install`, `uninstall` and `image build`; the
// scenarios' kind provider is meant to. It imports mesh, remote, trust and
// internal/istiocrd; primary never imports it (internal/imports pins that). See
// docs/deploy.md.
package deploy
