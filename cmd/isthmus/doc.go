// Command isthmus is the one Isthmus binary: the daemons (primary, gateway, ...) and the
// operator CLI are its subcommands. Flags are mapped to the library packages'
// configuration structs here and nowhere else; no package imports cmd.
//
//	isthmus cluster up --clusters 2     start real local clusters that keep running
//	isthmus cluster list                show them, with API URLs and kubeconfig paths
//	isthmus cluster down [NAME...]      stop them and remove everything they wrote
package main
