package scenarios

import (
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"
)

// WriteTable prints the report: the faults as done, then each cell's timeline (a row per
// phase), the reasons of failed phases, the process samples of a soak, and the verdict.
func (rep *FaultReport) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintf(tw, "scenario %s: %s of load at %d call(s)/s per client and service, %d call(s) measured\n\n", rep.Scenario, rep.Length.Duration, rep.Rate, len(rep.Calls))
	if len(rep.Faults) > 0 {
		fmt.Fprintln(tw, "FAULT\tKIND\tTARGET\tAPPLIED\tRESTORING\tRESTORED IN\tERROR")
		for _, e := range rep.Faults {
			errText := "-"
			if e.Error != "" {
				errText = e.Error
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", e.Fault.Name, e.Fault.Kind, e.Fault.Target, round(e.Applied.Duration),
				round(e.Restoring.Duration), (e.Restored.Duration - e.Restoring.Duration).Round(time.Millisecond), errText)
		}
		fmt.Fprintln(tw)
	}
	fmt.Fprintln(tw, "FROM\tSERVICE\tPHASE\tWINDOW\tCALLS\tFAILED\tP50\tP99\tANSWERED\tVERDICT")
	for _, c := range rep.Cells {
		for _, p := range c.Phases {
			v := "-"
			if len(p.Expectations) > 0 {
				v = "PASS"
				if !p.Passed {
					v = "FAIL"
				}
			}
			answered := make([]string, len(p.Answered))
			for i, h := range p.Answered {
				answered[i] = h.String()
			}
			a := strings.Join(answered, ", ")
			if a == "" {
				a = "none"
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s–%s\t%d\t%d\t%s\t%s\t%s\t%s\n", c.From, c.Service, p.Phase, round(p.Start.Duration), round(p.End.Duration),
				p.Calls, p.Failed, latency(p.P50.Duration), latency(p.P99.Duration), a, v)
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	failedPhases := 0
	for _, c := range rep.Cells {
		for _, p := range c.Phases {
			for _, e := range p.Expectations {
				fmt.Fprintf(w, "  %s → %s, %s: expects %s\n", c.From, c.Service, p.Phase, e)
			}
			if !p.Passed {
				failedPhases++
			}
			for _, r := range p.Reasons {
				fmt.Fprintf(w, "  FAIL %s → %s: %s\n", c.From, c.Service, r)
			}
		}
	}
	if len(rep.Processes) > 0 {
		fmt.Fprintln(w)
		tw = tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "PROCESS\tKIND\tAT\tPID\tRSS\tGOROUTINES")
		for _, s := range rep.Processes {
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%d\n", s.Name, s.Kind, s.At, s.PID, mib(s.RSSBytes), s.Goroutines)
		}
		if err := tw.Flush(); err != nil {
			return err
		}
	}
	faultErrs := 0
	for _, e := range rep.Faults {
		if e.Error != "" {
			faultErrs++
		}
	}
	if rep.Passed {
		_, err := fmt.Fprintf(w, "%s: every phase expectation holds\n", rep.Scenario)
		return err
	}
	_, err := fmt.Fprintf(w, "%s: %d phase(s) failed, %d fault(s) could not be applied or restored\n", rep.Scenario, failedPhases, faultErrs)
	return err
}

func latency(d time.Duration) string {
	if d == 0 {
		return "-"
	}
	if d < 10*time.Millisecond {
		return fmt.Sprintf("%.1fms", float64(d)/float64(time.Millisecond))
	}
	return d.Round(time.Millisecond).String()
}

func mib(b int64) string {
	if b < 0 {
		return "?"
	}
	return fmt.Sprintf("%.1f MiB", float64(b)/(1<<20))
}
