// Package imports holds no code, only a test that pins the import rules of the module's
// architecture (see docs/architecture.md): the dependency chain runs one way, mesh stays a
// leaf, the gateway stays free of client-go, and nothing imports cmd.
package imports
