package main

import (
	"fmt"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// kubeConfig loads a REST config the way kubectl does: --kubeconfig, else $KUBECONFIG,
// else ~/.kube/config, with --context choosing the context.
func kubeConfig(kubeconfig, kubeContext string) (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = kubeconfig
	rc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: kubeContext}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("load the kubeconfig (--kubeconfig, --context): %w", err)
	}
	return rc, nil
}

// kubeClient is kubeConfig's clientset.
func kubeClient(kubeconfig, kubeContext string) (kubernetes.Interface, error) {
	rc, err := kubeConfig(kubeconfig, kubeContext)
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(rc)
}
