// Command hello is a tiny static program the image tests package instead of the real
// isthmus binary (which takes minutes to link on a loaded machine).
package main

import "fmt"

var version = "dev"

func main() { fmt.Println("hello", version) }
